"""Credentials in a tracking URI's query string are refused like user:password@, wherever a URI
enters (config, MLFLOW_TRACKING_URI, replay's --uri, a direct log), and never echoed."""

from pathlib import Path

import pytest

from dist_free import train
from dist_free.tracking import TrackingConfigError, build_tracker, check_uri, log_to_run, redact, shown_uri
from dist_free.tracking.__main__ import main as tracking_main

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
SECRET = "s3cret"
QUERY_SECRETS = [
    f"postgresql://db.example/mlflow?user=ml&password={SECRET}",
    f"https://mlflow.example/?token={SECRET}",
    f"https://mlflow.example/api?access_token={SECRET}",
    f"http://mlflow.example:5000/?x=1&X-Api-Key={SECRET}",
    f"https://store.blob.example/c?sv=2024-01-01&sig={SECRET}",          # an Azure SAS
    f"https://bucket.s3.example/x?X-Amz-Signature={SECRET}",             # an S3 pre-signed URL
    f"mysql+pymysql://db.example/mlflow?passwd={SECRET}",
    f"mssql+pyodbc:///?odbc_connect=DRIVER%3Dodbc%3BPWD%3D{SECRET}",     # a connection string
    f"https://mlflow.example/#client_secret={SECRET}",
    f"https://mlflow.example/?a=1;auth={SECRET}",
    f"https://mlflow.example/?Pass%77ord={SECRET}",                      # percent-encoded name
    f"https://mlflow.example/api;password={SECRET}/runs",                # an RFC 3986 path parameter
    f"postgresql://db.example/mlflow;sslmode=require;token={SECRET}",
]
HOW = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@pytest.mark.parametrize("uri", QUERY_SECRETS)
def test_a_query_parameter_named_as_a_secret_is_refused_without_echoing_it(uri):
    with pytest.raises(TrackingConfigError, match="carries credentials in a query parameter") as err:
        check_uri(uri)
    assert all(name in str(err.value) for name in HOW) and SECRET not in str(err.value)


def test_query_settings_that_are_not_secrets_pass():
    for uri in ("postgresql://db.example/mlflow?sslmode=require&passfile=/home/u/.pgpass"
                "&sslkey=/home/u/client.key&require_auth=scram-sha-256",
                "mysql+pymysql://db.example/mlflow?ssl_key=/k.pem&charset=utf8mb4",
                "sqlite:////tmp/mlflow.db?mode=ro", "https://mlflow.example/path?x=1#top"):
        check_uri(uri)


def test_a_shown_uri_masks_the_user_part_and_every_query_value():
    assert shown_uri(f"http://alice:{SECRET}@h:5000/p?x=1&token={SECRET}#k={SECRET}") == \
        "http://***@h:5000/p?x=***&token=***#k=***"
    assert shown_uri(f"https://h/?{SECRET}") == "https://h/?***"
    assert shown_uri(f"https://h/a;v=1;token={SECRET}/b?k=2") == "https://h/a;v=***;token=***/b?k=***"
    for plain in ("sqlite:////abs/mlflow.db", "http://127.0.0.1:5000", "databricks"):
        assert shown_uri(plain) == plain


def test_redact_masks_a_uri_that_an_error_quotes_whole_or_in_part():
    uri = "http://bob@127.0.0.1:9/?team=vision42"
    error = f"API request to {uri}/api failed (url: /?team=vision42/api, user bob@127.0.0.1)"
    assert redact(error, uri) == ("API request to http://***@127.0.0.1:9/?team=***/api failed "
                                  "(url: /?team=***/api, user ***@127.0.0.1)")


@pytest.mark.parametrize("uri", QUERY_SECRETS[:2])
@pytest.mark.parametrize("via", ["config", "environment"])
def test_train_refuses_it_before_any_process_group(tmp_path, monkeypatch, capfd, uri, via):
    monkeypatch.setattr(train.distributed, "init", lambda *a: pytest.fail("a process group"))
    args = ["--config", DEMO, f"data.root={tmp_path / 'data'}", f"run.dir={tmp_path / 'runs'}",
            "tracking.enabled=true"]
    if via == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        args.append(f"tracking.uri={uri}")
    assert train.main(args) == 2
    out, err = capfd.readouterr()
    assert "config error: tracking.uri:" in err and all(name in err for name in HOW)
    assert SECRET not in out + err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_a_tracker_refuses_it_on_every_rank(tmp_path, monkeypatch, via):
    uri = QUERY_SECRETS[1]
    if via == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for rank in (0, 1):
        with pytest.raises(TrackingConfigError, match="query parameter"):
            build_tracker(enabled=True, uri=uri if via == "argument" else None, experiment="e",
                          run_name="r", run_dir=tmp_path, rank=rank)
    assert not any(tmp_path.iterdir())


def test_replay_refuses_it_in_one_line(tmp_path, capsys):
    assert tracking_main(["replay", str(tmp_path), "--uri", QUERY_SECRETS[0]]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "MLFLOW_TRACKING_PASSWORD" in err and SECRET not in out + err


def test_a_direct_log_refuses_it_before_any_request(tmp_path, monkeypatch):
    import mlflow
    monkeypatch.setattr(mlflow, "MlflowClient", lambda *a: pytest.fail("a client was made"))
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(TrackingConfigError, match="query parameter"):
        log_to_run(QUERY_SECRETS[1], "0" * 32, {"m": 1.0}, {}, tmp_path / "r.json", "final_eval")


# A password holding "/", "?" or "#" ends urlsplit's netloc early, but SQLAlchemy reads the
# user part up to the last "@" (found by the review of issue 27).
EARLY_NETLOC = ["postgresql://user:p/ss@host/db", "postgresql://user:pa?ss@host/db",
                "mysql://bob:se#cret@host/db"]


@pytest.mark.parametrize("uri", EARLY_NETLOC)
def test_a_password_that_ends_the_netloc_early_is_refused_and_never_shown(uri):
    secret = uri.split("//", 1)[1].rsplit("@", 1)[0].split(":", 1)[1]
    with pytest.raises(TrackingConfigError) as err:
        check_uri(uri)
    assert secret not in str(err.value)
    assert secret not in shown_uri(uri)
