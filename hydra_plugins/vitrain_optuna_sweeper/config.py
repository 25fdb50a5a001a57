"""The sweeper's settings (``hydra/sweeper=vitrain_optuna``), its samplers (``hydra/sweeper/sampler=tpe|random|
cmaes|grid|nsgaii|gp|qmc``) and its pruners (``hydra/sweeper/pruner=none|median|hyperband|successive_halving``).

Each sampler and pruner is an Optuna class (``_target_``) and the arguments users set most; any other argument
of that class is added with ``+hydra.sweeper.sampler.NAME=VALUE``. ``python -m vitrain.train hparams_search=optuna
--cfg hydra -p hydra.sweeper`` prints them all.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in sys.modules, where
# dataclasses look string annotations up.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TPESamplerConfig:
    """Optuna's default: tree-structured Parzen estimators, after ``n_startup_trials`` random trials."""

    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None  # the same seed (and the same results) propose the same trials
    n_startup_trials: int = 10  # random trials before TPE models the results
    n_ei_candidates: int = 24  # candidates drawn to choose each proposal from
    multivariate: bool | None = None  # model the parameters jointly (null: Optuna's default, false)
    group: bool = False  # with multivariate: model conditional parameter groups apart
    constant_liar: bool = False  # with n_jobs > 1: avoid proposing near the trials still running
    consider_prior: bool | None = None  # the keys of hydra-optuna-sweeper's TPE config (null: Optuna's default)
    prior_weight: float | None = None
    consider_magic_clip: bool | None = None
    consider_endpoints: bool | None = None
    warn_independent_sampling: bool | None = None


@dataclass
class RandomSamplerConfig:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None  # the same seed proposes the same trials


@dataclass
class CmaEsSamplerConfig:
    """CMA-ES: for continuous (and integer) parameters; categorical ones are sampled at random."""

    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None  # the same seed (and the same results) propose the same trials
    sigma0: float | None = None  # the initial step size; null: a sixth of the search space's range
    n_startup_trials: int = 1  # random trials before CMA-ES starts
    consider_pruned_trials: bool = False  # learn from pruned trials too
    x0: Any = None  # the initial mean, a mapping of parameter to value; null: the middle of the search space
    restart_strategy: str | None = None  # ipop | bipop: restart with a larger population when CMA-ES converges
    popsize: int | None = None  # the population size; null: CMA-ES's default for the dimension
    inc_popsize: int = -1  # with a restart strategy: the factor of the population's growth (-1: Optuna's default)
    use_separable_cma: bool = False  # a diagonal covariance: faster for many parameters
    with_margin: bool = False  # CMA-ES with margin, for integer and discrete parameters
    lr_adapt: bool = False  # adapt the learning rate (for multimodal or noisy objectives)
    warn_independent_sampling: bool = True


@dataclass
class GridSamplerConfig:
    """Every combination of the ``choice()`` and ``range()`` values, in a seeded random order; ``n_trials`` is
    capped at the grid's size. The search space is filled in from ``params`` when the sweep starts."""

    _target_: str = "optuna.samplers.GridSampler"
    seed: int | None = None  # the order in which the grid is visited


@dataclass
class NSGAIISamplerConfig:
    """NSGA-II, the genetic algorithm for several objectives (``direction: [maximize, minimize]``)."""

    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None  # the same seed (and the same results) propose the same trials
    population_size: int = 50  # trials per generation
    mutation_prob: float | None = None  # per parameter; null: 1 / number of parameters
    crossover_prob: float = 0.9  # the chance that a child is a crossover of two parents
    swapping_prob: float = 0.5  # the chance of taking each parameter from the other parent
    constraints_func: Any = None  # a node with a _target_: a function of a trial returning its constraint values


@dataclass
class GPSamplerConfig:
    """Gaussian-process Bayesian optimization (Optuna's GPSampler; needs scipy): sample-efficient for a few
    continuous parameters and tens of trials."""

    _target_: str = "optuna.samplers.GPSampler"
    seed: int | None = None  # the same seed (and the same results) propose the same trials
    n_startup_trials: int = 10  # random trials before the Gaussian process models the results
    deterministic_objective: bool = False  # true: the objective has no noise (rarely so for training runs)


@dataclass
class QMCSamplerConfig:
    """Quasi-Monte Carlo (Optuna's QMCSampler; needs scipy): low-discrepancy points, a space covered more evenly
    than by random sampling."""

    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None  # the scrambling's seed
    qmc_type: str = "sobol"  # sobol | halton
    scramble: bool = True  # randomized QMC (false: the same points in every study)


@dataclass
class MOTPESamplerConfig:
    """Removed in Optuna 4 (hydra-optuna-sweeper still names it): a sweep with it stops in one line at the start."""

    _target_: str = "optuna.samplers.MOTPESampler"
    seed: int | None = None


@dataclass
class NopPrunerConfig:
    """No pruning: every trial runs all its epochs."""

    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConfig:
    """Stop a trial whose value after an epoch is worse than the median of earlier trials' after that epoch."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # finished trials before any trial is pruned
    n_warmup_steps: int = 0  # epochs each trial runs before it can be pruned
    interval_steps: int = 1  # judge every N epochs
    n_min_trials: int = 1  # trials that must have reached an epoch before it is judged


@dataclass
class HyperbandPrunerConfig:
    """Hyperband: successive halving in several brackets with different early-stopping rates."""

    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1  # epochs every trial gets before the first rung
    max_resource: Any = "auto"  # the epochs of a full trial; auto: the most any finished trial ran
    reduction_factor: int = 3  # 1/N of the trials go on at each rung
    bootstrap_count: int = 0  # trials that must reach a rung before it prunes


@dataclass
class SuccessiveHalvingPrunerConfig:
    """Asynchronous successive halving: at epochs min_resource * reduction_factor**k, keep the top 1/N."""

    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"  # epochs before the first rung; auto: from the first finished trial
    reduction_factor: int = 4  # 1/N of the trials go on at each rung
    min_early_stopping_rate: int = 0  # shifts the rungs later by this many powers of reduction_factor
    bootstrap_count: int = 0  # trials that must reach a rung before it prunes


@dataclass
class VitrainOptunaSweeperConf:
    """``hydra/sweeper=vitrain_optuna``: an Optuna study whose trials are the runs of a Hydra multirun."""

    _target_: str = "hydra_plugins.vitrain_optuna_sweeper.optuna_sweeper.VitrainOptunaSweeper"
    _recursive_: bool = False  # the sweeper builds the sampler and pruner itself (the grid needs params)
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    sampler: Any = MISSING  # hydra/sweeper/sampler=tpe|random|cmaes|grid|nsgaii|gp|qmc, or a node with a _target_
    pruner: Any = MISSING  # hydra/sweeper/pruner=none|median|hyperband|successive_halving, a name, or a _target_
    direction: Any = "minimize"  # minimize | maximize, or a list of them for several objectives
    n_trials: int = 20  # trials in this sweep (a resumed study gets this many more)
    n_jobs: int = 1  # trials launched at once, in parallel when the launcher runs jobs in parallel
    storage: str | None = None  # e.g. sqlite:///optuna.db; null: sqlite in the sweep folder (<sweep dir>/optuna.db)
    study_name: str | None = None  # the study in storage; an existing one is continued; null: a new random name
    max_failure_rate: float = 0.0  # the share of this sweep's trials that may fail before it stops
    params: dict[str, str] | None = None  # the search space, in Hydra's override syntax (interval, range, choice)
    custom_search_space: str | None = None  # module.function(cfg, trial), called for each trial: suggests more
    #   parameters with trial.suggest_* (define-by-run, e.g. conditional ones), each passed to the run as key=value
    heartbeat_interval: int = 60  # seconds between the sweep's "still running" marks in the storage; a continued
    #   sweep fails and runs again the trials of a killed sweep (no mark for twice this); 0: off


def register() -> None:
    """Register the sweeper, its samplers and its pruners with Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name="vitrain_optuna", node=VitrainOptunaSweeperConf, provider="vitrain")
    samplers = {"tpe": TPESamplerConfig, "random": RandomSamplerConfig, "cmaes": CmaEsSamplerConfig,
                "grid": GridSamplerConfig, "nsgaii": NSGAIISamplerConfig, "gp": GPSamplerConfig,
                "qmc": QMCSamplerConfig, "motpe": MOTPESamplerConfig}
    for name, node in samplers.items():
        store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="vitrain")
    pruners = {"none": NopPrunerConfig, "median": MedianPrunerConfig, "hyperband": HyperbandPrunerConfig,
               "successive_halving": SuccessiveHalvingPrunerConfig}
    for name, node in pruners.items():
        store.store(group="hydra/sweeper/pruner", name=name, node=node, provider="vitrain")


register()
