"""Ray orchestration: the driver that launches workers and the job commands for remote clusters."""
