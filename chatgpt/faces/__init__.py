"""One module per client surface: wire in, questions to the pipeline, answers out in that surface's shape."""
