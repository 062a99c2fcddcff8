"""Software-defined assets: lookup cache -> staged orders -> promoted orders -> views."""

GROUP = "orders_pipeline"
OWNERS = ["team:data-platform"]
