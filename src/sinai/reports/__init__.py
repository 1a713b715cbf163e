"""Tables and plots in the papers' layouts."""
