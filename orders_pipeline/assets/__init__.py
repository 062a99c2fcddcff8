"""The Dagster definitions of the pipeline, one module per area.

`queue`: the Redis ingestion queue (external), its observations and checks. `lookup`: the
Postgres lookup tables (external) and their snapshot in Redis. `orders`: staging (with its
rejects) and promotion (with the view rollups). `views`: the dashboard views. `checks`: the
data checks of those assets. `catalog`: how the catalog renders them. `tables`: column schemas.
"""

GROUP = "orders_pipeline"
OWNERS = ["team:data-platform"]
