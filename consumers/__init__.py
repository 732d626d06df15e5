"""Downstream consumers of the mail queue. Plain code: never imports azure.functions."""
