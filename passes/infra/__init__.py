"""Pass infrastructure: the contract every pass declares (`base`), the pipeline that checks
and runs an order of passes (`pipeline`), and what it runs around each pass (`instruments`)."""
