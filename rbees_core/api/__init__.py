"""Wire types of the three daemons (CONTRACT sections 1-5), as attrs classes.

Limits live on the fields (:func:`rbees_core.schema.field`); the OpenAPI documents are
generated from these same classes.
"""
