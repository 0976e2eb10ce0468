"""Bias-Aware DPO preference data (SPEC §7), built on the public API of `scail2.data`.

- `records`: the preference manifest (`PreferenceRecord`, parse / load / write); `validate`: its file checks.
- `builder`: the pair builder of paper Eq. 4-7 (`build_preferences`); `components`: its pluggable generator and
  reference source, and the synthetic components that run it without a model.
- `data`: decoding and encoding a pair, `collate_preferences` -> `PreferenceBatch`, `PreferencePairDataset`;
  `cache`: the preference cache (`build_preference_cache`, `PreferenceCacheDataset`); `datamodule`:
  `PreferenceDataModule`.

Importing the package does nothing; import the submodules.
"""
