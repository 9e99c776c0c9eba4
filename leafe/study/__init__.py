"""`leafe run`: a study config (config), its stage plan and execution (plan), the report (report,
show)."""
