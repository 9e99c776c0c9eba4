"""`leafe run`: a study config (config), what its stages are (stages; their resources: budget), running
them (runner, parallel; study: `Study`, results.json), the report (report, show)."""
