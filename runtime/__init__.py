"""Function runtime: model code, engine, OpenAI + CloudEvents server, worker start-up."""
