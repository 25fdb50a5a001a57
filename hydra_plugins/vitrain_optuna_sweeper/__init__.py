"""vitrain's Hydra sweeper over Optuna (>= 4): ``hydra/sweeper=vitrain_optuna``, with pruning.

``config.py`` registers the sweeper, its samplers and its pruners with Hydra's ConfigStore; ``optuna_sweeper.py``
runs the study; ``_search_space.py`` turns ``hydra.sweeper.params`` into Optuna distributions; ``_mlflow_run.py``
makes the sweep one MLflow run, its trials' runs nested under it, when they log to MLflow. Hydra finds the
plugin because ``hydra_plugins`` is a namespace package (it has no ``__init__.py``).
"""
