"""The stages of the method, one module each: rate, filter, train, generate, judge, report.

Each reads a typed config and a run directory and writes its artifacts there; the stages that ask
a model supply a task to the LLM layer (`alpagasus_ray.llm`) and say where its results go.
"""
