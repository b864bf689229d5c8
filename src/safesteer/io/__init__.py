"""Reading what the user names: models, prompt sets and the registry packages that ship them."""
