"""Implant templating: the implant library (library), implant meshes and outlines (meshes), the
automatic plan and what it changes (plan), plan editing with undo/redo (editor), and
``hipatlas plan`` (cli_plan). See docs/templating.md."""
