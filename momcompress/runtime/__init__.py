"""Runtime modules: the frozen MoM FFN in torch and loading a frozen model folder."""
