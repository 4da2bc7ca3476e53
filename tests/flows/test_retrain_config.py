from flows.retrain import with_transient_retries


def test_weekly_rebuild_retries_transient_download_failures():
    assert with_transient_retries(None) == {"download": {"retry_transient": True}}
    kept = with_transient_retries({"download": {"timeout": 3}, "processes": 2})
    assert kept == {"download": {"retry_transient": True, "timeout": 3}, "processes": 2}
    assert with_transient_retries({"download": {"retry_transient": False}})["download"]["retry_transient"] is False
