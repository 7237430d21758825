"""Registry events in (verified MLflow webhooks), Prefect events out."""
