"""Learning masks and routers: gates, the MoM layer, ratio control, initialisation, the trainer."""
