"""The paper's rules as pure functions, with doctests and no Ray: the prompts and their readers
(`prompts`, `judging`), the selection modes (`selection`), the fine-tuning recipe (`recipe`), and
the arithmetic of rate limits (`ratelimit`)."""
