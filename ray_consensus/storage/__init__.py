"""Where bytes live: the run root on a local folder or any S3-compatible store (`store`), data files
anywhere, read, listed and versioned (`datafiles`), the S3 connection and its requests (`s3`), path
strings (`paths`), the fast local walk (`listing`), the one atomic write (`atomic`) and the lease that
keeps two runs out of one root (`lease`).
"""
