"""Low-level helpers every layer may use: files and atomic writes, safe XML, host tools."""
