"""Rate limits: the policy around the compiled buckets in gateway._fast."""
