"""What a request asks of the sampler and when it stops, with vLLM's names and meanings."""
from __future__ import annotations

from dataclasses import dataclass, field

from lowbit.engine.structured_output import StructuredOutput
from lowbit.errors import LowbitError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top probability
    # CTRL-style (Keskar et al. 2019), over prompt and output tokens: a seen token's logit is
    # divided by the penalty where positive, multiplied where negative; 1.0 means off.
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # subtracted once from the logit of each token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    seed: int | None = None  # a private generator, so the draw does not depend on the rest of the batch
    stop: list[str] = field(default_factory=list)  # the text ends before the first stop string
    stop_token_ids: list[int] = field(default_factory=list)  # beside the model's own end tokens
    ignore_eos: bool = False  # keep going past the model's end tokens (benchmarks)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # the sampled token's logprob plus this many top alternatives
    skip_special_tokens: bool = True
    # token id -> added to its logit before penalties and sampling (OpenAI's logit_bias, -100..100:
    # -100 all but bans a token, 100 all but forces it)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # the output must match a JSON schema, any JSON object, a regex or a choice (structured_output.py)
    structured_output: StructuredOutput | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = dict(self.logit_bias or {})
        checks = [
            (self.max_tokens >= 1, f"max_tokens={self.max_tokens}: must be at least 1"),
            (self.temperature >= 0, f"temperature={self.temperature}: must be >= 0 (0 is greedy)"),
            (self.top_k >= 0, f"top_k={self.top_k}: must be >= 0 (0 is off)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1]"),
            (0 <= self.min_p <= 1, f"min_p={self.min_p}: must be in [0, 1]"),
            (self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 is off)"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty={self.presence_penalty}: must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty={self.frequency_penalty}: must be in [-2, 2]"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs={self.logprobs}: must be >= 0"),
            (all(s for s in self.stop), "stop: empty stop strings are not allowed"),
            (all(isinstance(t, int) and t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias.items()),
             "logit_bias: token ids must be integers >= 0 and biases in [-100, 100]"),
            (self.structured_output is None or isinstance(self.structured_output, StructuredOutput),
             "structured_output: must be a lowbit.StructuredOutput"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LowbitError(f"SamplingParams {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def argmax_only(self) -> bool:
        """The token is the logits' argmax and nothing else is asked of them (no penalties, bias or
        logprobs): the model runner's shortcut past the sampler, and runs of decode steps."""
        return self.greedy and not self.has_penalties and not self.logit_bias and self.logprobs is None
