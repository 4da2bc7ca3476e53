"""Prefect flows (the only Prefect code in cc4m) and the `cc4m` command-line tool."""
