"""The workflows, one request -> one result each, above both branches: what the command line,
the demo, the search's bake check and the tools run. A job resolves its options once, runs,
and returns what the caller prints."""
