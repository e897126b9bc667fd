"""Where bytes live: run roots and data files on a local folder or any S3-compatible store
(`store`), the fast local walk (`listing`) and the lease that keeps two runs out of one root (`lease`).
"""
