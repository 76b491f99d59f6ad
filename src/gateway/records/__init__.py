"""Records: the batched writer for request logs, audit entries and metrics."""
