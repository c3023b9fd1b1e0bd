"""Analyses beyond Figure 4: what the paper measures and shows besides the evolution grids."""
