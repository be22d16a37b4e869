"""Work: the worker claims a job, runs the model, encodes and validates the results into the outbox."""
