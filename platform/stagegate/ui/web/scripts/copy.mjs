// Copies the page shell and stylesheet next to the compiled modules.
import { cpSync } from "node:fs";
import { fileURLToPath } from "node:url";

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
cpSync(here("../public"), here("../../static"), { recursive: true });
