"""MLflow: where every stage logs its runs, metrics, figures and models."""
