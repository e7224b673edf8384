#!/usr/bin/env node
import { installProcessErrorReport, main } from '../dist/cli/main.js';

installProcessErrorReport();

process.exitCode = await main(process.argv.slice(2));
