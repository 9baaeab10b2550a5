"""cxr_pipeline: the one name this project installs.

The checkout keeps the stages as top-level folders (etl/, training/, jobs/); setup.py maps them
under this package (`cxr_pipeline.etl`, `cxr_pipeline.training`, `cxr_pipeline.jobs`), so a wheel
installs a single top-level name next to other libraries instead of generic ones like `etl` or
`training`. Code imports the installed names everywhere, and the editable install (`make install`)
maps them onto the folders, so the checkout and the wheel run the same modules.

What both stages share lives here: `config` (YAML files as command-line defaults) and `schema`
(the Parquet layout of a preprocessed dataset, the contract between the ETL and training).
Neither imports Spark or torch.
"""
