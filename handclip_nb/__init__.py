"""HandCLIP workbench."""
