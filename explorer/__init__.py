"""The explorer's logic, importable and testable without a browser.

`app.py` and `pages/*.py` are thin Streamlit scripts; loading (`data`), graph logic
(`graph`), figure building (`figures`), live jobs (`jobs`) and colours (`style`) live
here. Only `widgets` imports streamlit, and nothing here imports torch or transformers:
live work runs in `python -m engine ...` subprocesses.
"""
