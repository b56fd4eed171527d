"""The LLM layer: every stage that asks a model (rate, generate, judge) goes through it.

Its modules import only downward:

    driver        the passes: first, retry of request failures, re-ask of unreadable replies
    results       a stage's results as Parquet parts (`PartResults`)
    engines/      one module per backend behind `engines.base.Engine`; `engines.engine_for`
                  is the only place that reads a backend's name
    wire          a Request as an OpenAI request body; a response body as a Reply
    task          the vocabulary: Request, Reply, LLMTask, the result columns, the ask-again policy

The arithmetic of the API's rate limits is a pure rule, in `rules.ratelimit`. A stage supplies a
task (what a row asks, how a reply is read) and where its results go; the engine and the driver do
the rest.
"""
