from m1jax.rollout.engine import FINISH_REASONS, Rollout, generate, left_pad
from m1jax.rollout.sampling import Sample, SamplingParams, sample, truncate
from m1jax.rollout.slots import SlotRun, generate_slots, prompt_bucket

__all__ = ["FINISH_REASONS", "Rollout", "generate", "left_pad", "Sample", "SamplingParams", "sample", "truncate",
           "SlotRun", "generate_slots", "prompt_bucket"]
