"""The job file: every key validated before anything runs, errors that name the key."""

from pathlib import Path

import pytest

from runner.errors import JobError
from runner.job import load_job, parse_job

JOB = Path("/jobs/x.toml")


def parse(text: str, env: dict[str, str] | None = None, **kw):
    return parse_job(text, JOB, env if env is not None else {"XIMILAR_TOKEN": "t0k"}, **kw)


MINIMAL = 'name = "j"\n[source]\npaths = ["imgs/"]\n'


def test_minimal_job_gets_documented_defaults():
    job = parse(MINIMAL)
    assert job.api.endpoint == "sandbox"
    assert job.api.batch_size == 10 and job.api.concurrency == 4
    assert job.api.timeout_s == 60 and job.api.max_retries == 5
    assert job.images.max_side == 0 and job.images.send == "base64"
    assert job.credits.per_image == 10 and job.credits.budget is None and job.credits.reuse
    assert job.executor.kind == "local"
    assert job.db_path == Path("/jobs/state/j.db")


def test_relative_paths_are_relative_to_the_job_file_and_urls_stay():
    job = parse('name = "j"\n[source]\npaths = ["imgs/", "s3://b/p/", "/abs"]\n'
                '[state]\ndb = "../db/x.db"\n')
    assert job.source.paths == ("/jobs/imgs/", "s3://b/p/", "/abs")
    assert job.db_path == Path("/db/x.db")


def test_full_job_parses_every_documented_key():
    job = parse('''
name = "cards-nightly"
[source]
paths = ["s3://cards-inbox/2026/"]
recursive = false
include = ["*.jpg"]
exclude = ["tmp/*"]
[source.storage_options]
endpoint_url = "http://127.0.0.1:9000"
anon = false
[api]
endpoint = "https://api.ximilar.com/collectibles/v2/tcg_id"
token_env = "XIMILAR_TOKEN"
fields = { lang = "en", pricing = true }
batch_size = 5
concurrency = 8
timeout_s = 90
max_retries = 3
[images]
max_side = 1600
transcode = ["avif", "heif"]
send = "url"
[credits]
per_image = 10
budget = 5000
reuse = false
[state]
db = "state/cards.db"
[executor]
kind = "dask"
address = "tcp://scheduler:8786"
''')
    assert job.source.storage_options["endpoint_url"] == "http://127.0.0.1:9000"
    assert job.api.fields == {"lang": "en", "pricing": True}
    assert job.images.transcode == ("avif", "heif")
    assert not job.credits.reuse
    assert job.token == "t0k"
    assert "t0k" not in repr(job)


@pytest.mark.parametrize("text,key", [
    (MINIMAL + "[api]\nbatch_size = 11\n", "api.batch_size"),
    (MINIMAL + "[api]\nbatch_size = 0\n", "api.batch_size"),
    (MINIMAL + "[api]\nbatchsize = 5\n", "api.batchsize"),
    (MINIMAL + "[api]\nconcurrency = \"4\"\n", "api.concurrency"),
    (MINIMAL + "[api]\nendpoint = \"ftp://x\"\n", "api.endpoint"),
    (MINIMAL + "[images]\ntranscode = [\"gif\"]\n", "images.transcode"),
    (MINIMAL + "[images]\nsend = \"bytes\"\n", "images.send"),
    (MINIMAL + "[credits]\nbudget = -1\n", "credits.budget"),
    (MINIMAL + "[credits]\nreuse = \"yes\"\n", "credits.reuse"),
    ('name = "j"\nreuse = true\n[source]\npaths = ["a"]\n', "reuse"),
    (MINIMAL + "[executor]\nkind = \"k8s\"\n", "executor.kind"),
    (MINIMAL + "[sandbox]\np429 = 1.5\n", "sandbox.p429"),
    (MINIMAL + "[bogus]\nx = 1\n", "bogus"),
    ('[source]\npaths = ["a"]\n', "name"),
    ('name = "j"\n', "source.paths"),
    ('name = "j"\n[source]\npaths = "a"\nrecursive = 1\n', "source.recursive"),
])
def test_bad_job_is_refused_naming_the_key(text, key):
    with pytest.raises(JobError) as exc:
        parse(text)
    assert str(exc.value).startswith(key)


def test_missing_token_variable_is_refused_for_a_real_endpoint():
    text = MINIMAL + '[api]\nendpoint = "https://api.ximilar.com/collectibles/v2/tcg_id"\n' \
        'token_env = "MY_TOKEN"\n'
    with pytest.raises(JobError, match="api.token_env.*MY_TOKEN"):
        parse(text, env={})
    assert parse(text, env={}, require_token=False).token is None
    assert parse(text, env={"MY_TOKEN": "abc"}).token == "abc"


def test_sandbox_needs_no_token():
    assert parse(MINIMAL, env={}).token is None


def test_sandbox_table_only_with_the_sandbox_endpoint():
    text = MINIMAL + '[api]\nendpoint = "https://h/x"\n[sandbox]\nlatency_ms = 5\n'
    with pytest.raises(JobError, match="^sandbox"):
        parse(text)


def test_endpoint_batch_caps_apply_to_defaults_and_refuse_explicit_excess():
    grade = MINIMAL + '[api]\nendpoint = "https://api.ximilar.com/card-grader/v2/grade"\n'
    assert parse(grade).api.batch_size == 2
    with pytest.raises(JobError, match="api.batch_size"):
        parse(grade + "batch_size = 3\n")


def test_invalid_toml_is_a_job_error():
    with pytest.raises(JobError, match="not valid TOML"):
        parse("name = \n")


def test_load_job_reports_a_missing_file(tmp_path):
    with pytest.raises(JobError, match="no such job file"):
        load_job(tmp_path / "nope.toml")


def test_request_signature_changes_with_endpoint_or_fields():
    a = parse(MINIMAL + "[api]\nfields = { lang = \"en\" }\n")
    b = parse(MINIMAL + "[api]\nfields = { lang = \"de\" }\n")
    c = parse(MINIMAL + "[api]\nfields = { lang = \"en\" }\n")
    assert a.request_signature() != b.request_signature()
    assert a.request_signature() == c.request_signature()
