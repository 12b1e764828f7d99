"""difftilt.core: the domain-agnostic library.

Processes and their transitions (:mod:`.process`, :mod:`.distributions`), rewards
(:mod:`.reward`), the entropy-regularized objective's optimizers (:mod:`.strategies`,
:mod:`.system`), ELEGANT (:mod:`.finetune`), plugins (:mod:`.plugins`) and runs
(:mod:`.run`, :mod:`.cli`). It imports torch, lightning, numpy and the standard
library only -- never a plugin.
"""

from .distributions import CategoricalStep, GaussianStep, SinglePositionStep, StepDistribution
from .errors import (
    AwaitingAnswers,
    BudgetExceededError,
    CheckpointError,
    ConfigError,
    DeterministicStepError,
    DifftiltError,
    InputDataError,
    OptionalDependencyError,
    OracleError,
    PluginNotFoundError,
    RewardError,
    TrainingDivergedError,
    ShapeError,
)
from .finetune import Finetuner, FinetuneResult, ValueReward, estimate_kl, estimate_path_kl
from .nets import TimeMLP
from .plugins import Domain, list_plugins, load_plugin
from .process import BrownianProcess, ChainedProcess, ControlledProcess, Process, ResidualControlProcess, freeze
from .oracle import Oracle, OracleAnswer
from .reward import FunctionReward, Reward, RewardOutput, WeightedSumReward
from .reward_models import (AcquisitionReward, EnsembleRewardModel, Greedy, LastLayerUCBRewardModel, MaxOverHeads,
                            Posterior, RewardModel, Thompson, UCB)
from .store import FeedbackStore, SQLiteFeedbackStore
from .rollout import Trajectory, differentiable_rollout, sample_trajectories
from .strategies import DirectBackprop, PathCrossEntropy, PolicyGradient, Strategy, UpdateContext, UpdateOutput, make_strategy
from .system import EntropyRegularizedSystem

__all__ = [
    "StepDistribution", "GaussianStep", "CategoricalStep", "SinglePositionStep",
    "DifftiltError", "ConfigError", "ShapeError", "InputDataError", "RewardError", "DeterministicStepError",
    "PluginNotFoundError", "OptionalDependencyError", "CheckpointError", "BudgetExceededError", "OracleError",
    "AwaitingAnswers", "TrainingDivergedError",
    "Oracle", "OracleAnswer", "FeedbackStore", "SQLiteFeedbackStore",
    "RewardModel", "EnsembleRewardModel", "LastLayerUCBRewardModel", "Posterior", "AcquisitionReward",
    "UCB", "MaxOverHeads", "Greedy", "Thompson",
    "Finetuner", "FinetuneResult", "ValueReward", "estimate_kl", "estimate_path_kl",
    "TimeMLP",
    "Domain", "load_plugin", "list_plugins",
    "Process", "ResidualControlProcess", "ControlledProcess", "BrownianProcess", "ChainedProcess", "freeze",
    "Reward", "RewardOutput", "FunctionReward", "WeightedSumReward",
    "Trajectory", "sample_trajectories", "differentiable_rollout",
    "Strategy", "DirectBackprop", "PolicyGradient", "PathCrossEntropy", "UpdateContext", "UpdateOutput", "make_strategy",
    "EntropyRegularizedSystem",
]
