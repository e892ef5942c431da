"""Reading a study back: data frames and the Pareto front, the HTML report."""
