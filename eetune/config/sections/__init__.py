"""The config's sections, one dataclass each, grouped by concern; `eetune.config.schema`
assembles them into `EetuneConfig` and re-exports every one of them."""
