"""Reference implementation of a Dynamo-style frontend's model-card handling.

The data path, one module per arrow (see README):
    worker.card_builder -> worker.metadata_server -> (discovery) -> resolve -> harvest -> local_dir

This package never imports pytest: the suites under ``suites/`` test it, and a user's own
frontend, through the same checks.
"""

__version__ = "0.1.0"
