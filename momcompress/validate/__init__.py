"""`validate`: accuracy, cost and speed of a compressed model against its dense original (DESIGN.md, "Validation")."""
