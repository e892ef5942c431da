"""The search: its configuration, opening a study, the trial loop, workers, spaces, sampling and
the final re-time plan. `autoprec.search.loop.run_search` is the entry point."""
