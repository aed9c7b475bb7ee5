"""Every exception insitu raises.

Each class also inherits the builtin a user would naturally catch, so
``except ValueError`` or ``except TimeoutError`` keeps working.

Examples
--------
>>> from insitu.errors import ContractError, InsituError
>>> issubclass(ContractError, ValueError) and issubclass(ContractError, InsituError)
True
"""

from __future__ import annotations

__all__ = [
    "AnalyticsFailedError",
    "BackpressureTimeout",
    "BlocksLostError",
    "BypassError",
    "CallbackError",
    "ConfigError",
    "ContractError",
    "InsituError",
    "InsufficientSlicesError",
    "NodeLostError",
    "RelayLostError",
    "RunLostError",
    "RunNameError",
    "SendError",
    "SimulationFailedError",
    "SliceLostError",
    "SteeringValueError",
    "StepTimeoutError",
    "TaskCancelledError",
    "UnreachableRefError",
]


class InsituError(Exception):
    """Base class of every insitu exception."""


class ConfigError(InsituError, ValueError):
    """A configuration value (argument or ``INSITU_*`` variable) is invalid."""


class RunNameError(ConfigError):
    """No run name was given and none could be derived from the environment."""


class ContractError(InsituError, ValueError):
    """The arrays declared by the ranks do not form a valid decomposition, or set-up failed.

    Raised identically on every rank of the bridge's communicator.
    """


class SendError(ContractError):
    """A ``Bridge.send`` call was given bad input (raised identically on every rank).

    Nothing of the step was published; the simulation may catch it and go on.
    """


class SteeringValueError(InsituError, TypeError):
    """A steering value is not an ``int``, ``float``, ``bool`` or ``str``."""


class StepTimeoutError(InsituError, TimeoutError):
    """A wait passed its deadline; the message names what was missing."""


class BackpressureTimeout(StepTimeoutError):
    """The analytics did not free an in-flight slot before the deadline (policy ``block``)."""


class AnalyticsFailedError(InsituError, RuntimeError):
    """The analytics failed (callback exception or process death) and the policy is ``raise``."""


class SimulationFailedError(InsituError, RuntimeError):
    """A simulation rank died before closing its bridge; raised by ``Analytics.run``."""


class RunLostError(InsituError, RuntimeError):
    """The run's head actor (or the whole Ray cluster) went away under a consumer.

    Raised by ``Analytics.run``, naming the run and the last step the consumer received.
    """


class NodeLostError(InsituError, RuntimeError):
    """The insitu process of a node (its node actor) died: no later step can complete.

    Raised by ``Analytics.run``; the message names the node (address and id), its ranks and the
    last complete step.
    """


class BlocksLostError(InsituError, RuntimeError):
    """Blocks of a step died with the insitu process of their node, which was restarted: that step
    cannot be computed. Handed to a callback's ``on_error`` (else logged and counted in
    ``RunSummary.lost``); the run goes on with the steps after the gap.
    """

    def __init__(self, message: str, *, step: int, nodes: tuple[str, ...]) -> None:
        super().__init__(message)
        self.step = step
        self.nodes = nodes


class CallbackError(InsituError, RuntimeError):
    """An analytics callback raised; the message names the step and the arrays."""

    def __init__(self, message: str, *, step: int, arrays: tuple[str, ...]) -> None:
        super().__init__(message)
        self.step = step
        self.arrays = arrays


class RelayLostError(InsituError, RuntimeError):
    """The dispatch relay actor died while it carried this call (rerun only if marked retriable)."""


class UnreachableRefError(InsituError, ValueError):
    """An object ref in the arguments cannot be resolved where the work lands."""


class InsufficientSlicesError(InsituError, RuntimeError):
    """No allowed pool size could be reserved within the deadline."""


class SliceLostError(InsituError, RuntimeError):
    """A slice lost a host (dead, unhealthy, unresponsive or preempted) while work ran on it."""


class TaskCancelledError(InsituError, RuntimeError):
    """Work on a slice pool was cancelled by the caller."""


class BypassError(InsituError, ValueError):
    """A bypass YAML that breaks the schema, a bypassed call without a result, or a refused data path."""
