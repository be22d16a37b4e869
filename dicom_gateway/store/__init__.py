"""The job store: instances, studies, jobs and deliveries in one SQLite database."""
