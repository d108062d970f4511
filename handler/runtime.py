"""What every long-lived entrypoint builds once: the engine (cold start), the ledger, the processor."""

from models.engines import load_engine
from pipeline.adapters.sqlite_ledger import SQLiteLedger
from pipeline.process import Options, Processor


def open_processor(settings) -> Processor:
    options = Options.from_settings(settings)  # ConfigError on missing places, before the slow model load
    engine, spec = load_engine(settings)
    settings.outbox.mkdir(parents=True, exist_ok=True)
    options.failed.mkdir(parents=True, exist_ok=True)
    return Processor(engine, spec, options, SQLiteLedger(settings.ledger_path(), lease_s=settings.lease_s))
