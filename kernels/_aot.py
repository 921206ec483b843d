"""What an ahead-of-time compile needs to know about one kernel configuration."""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AotSpec:
    """One kernel instance the launcher can pick.

    ``signature`` maps every argument name of ``fn`` to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"i64"``, ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the value of each constexpr argument.
    ``name`` is a short label for the report, e.g. ``"sra_attention_fwd bf16 d64 M128 N64"``.
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
