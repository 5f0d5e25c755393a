"""kvpool inside other engines. Each module here imports its engine; nothing else in kvpool may."""
