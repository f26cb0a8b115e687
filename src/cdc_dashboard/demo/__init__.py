"""The demo: seed data (`seed`), the zero-setup `cdc-dashboard run` (`run`) and realistic traffic (`traffic`)."""
