"""Local stand-ins for the Azure services the app uses, for tests and the local run."""
